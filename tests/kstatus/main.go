// Command kstatus prints the kstatus health of Kubernetes objects, computed by
// sigs.k8s.io/cli-utils/pkg/kstatus/status exactly as Flux and cli-utils compute it,
// so the tests can check that llmops' status conventions read as intended.
//
// Input on stdin: one object as JSON or YAML, several YAML documents, a JSON array of
// objects, or a List (`kind: List`, or any kind ending in List, with `items`).
// Output: one line per object, `<Kind>/<name> <Status> <message>`. An object that
// cannot be judged prints `Unknown` with the reason; only unreadable input fails.
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

func main() {
	objects, err := read(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kstatus: %v\n", err)
		os.Exit(2)
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for _, obj := range objects {
		u := &unstructured.Unstructured{Object: obj}
		id := u.GetKind() + "/" + u.GetName()
		result, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(out, "%s %s %s\n", id, status.UnknownStatus, oneLine(err.Error()))
			continue
		}
		fmt.Fprintf(out, "%s %s %s\n", id, result.Status, oneLine(result.Message))
	}
}

// read splits stdin into YAML (or JSON) documents and flattens arrays and Lists.
func read(r io.Reader) ([]map[string]interface{}, error) {
	docs := utilyaml.NewYAMLReader(bufio.NewReader(r))
	var objects []map[string]interface{}
	for {
		doc, err := docs.Read()
		if errors.Is(err, io.EOF) {
			return objects, nil
		}
		if err != nil {
			return nil, err
		}
		if strings.TrimSpace(string(doc)) == "" {
			continue
		}
		data, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, err
		}
		// apimachinery's json keeps integers as int64, which the status rules
		// (observedGeneration, replica counts) read with NestedInt64.
		var value interface{}
		if err := utiljson.Unmarshal(data, &value); err != nil {
			return nil, err
		}
		found, err := flatten(value)
		if err != nil {
			return nil, err
		}
		objects = append(objects, found...)
	}
}

func flatten(value interface{}) ([]map[string]interface{}, error) {
	switch v := value.(type) {
	case nil:
		return nil, nil
	case []interface{}:
		var objects []map[string]interface{}
		for _, item := range v {
			found, err := flatten(item)
			if err != nil {
				return nil, err
			}
			objects = append(objects, found...)
		}
		return objects, nil
	case map[string]interface{}:
		kind, _ := v["kind"].(string)
		if items, ok := v["items"].([]interface{}); ok && strings.HasSuffix(kind, "List") {
			return flatten(items)
		}
		return []map[string]interface{}{v}, nil
	default:
		return nil, fmt.Errorf("expected an object, a list or an array, got %T", value)
	}
}

// oneLine keeps each object's output on one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
